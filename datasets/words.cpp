// The built-in English word list (written for this project, not downloaded) and
// the pickers for keys and numbers that the synthetic tasks hide.
#include <fmt/format.h>

#include <algorithm>
#include <set>

#include "datasets/task_support.h"

namespace inferlab::tasks {

// Words a task prompt itself uses ("list", "word", "common", "answer", ...) are
// left out, so counting a word in a prompt counts only the generated entries.
const std::vector<std::string_view>& word_list() {
  static const std::vector<std::string_view> words = {
      // nature
      "apple", "acorn", "anchor", "arrow", "autumn", "badger", "bamboo", "barley", "beach", "beetle", "berry",
      "birch", "blossom", "boulder", "branch", "breeze", "brook", "cactus", "canyon", "cedar", "cherry",
      "clover", "coral", "cotton", "creek", "daisy", "desert", "dolphin", "eagle", "falcon", "fern", "forest",
      "fossil", "garden", "glacier", "granite", "grape", "harbor", "hazel", "heron", "island", "ivy", "jungle",
      "lemon", "lily", "maple", "meadow", "melon", "moss", "mountain", "olive", "orchard", "otter", "owl",
      "peach", "pebble", "pine", "plum", "pond", "poppy", "rabbit", "raven", "reef", "ridge", "salmon",
      "spruce", "squirrel", "summit", "swan", "thistle", "tiger", "tulip", "valley", "walnut", "willow",
      "winter", "wolf", "zebra", "badlands", "lagoon", "marsh", "prairie", "tundra", "volcano", "pelican",
      "panther", "beaver", "lobster", "oyster", "sparrow", "robin", "walrus", "turtle", "lizard", "camel",
      // household and tools
      "basket", "blanket", "bottle", "bucket", "button", "candle", "carpet", "chair", "clock", "compass",
      "cushion", "drawer", "engine", "envelope", "fork", "hammer", "helmet", "jacket", "kettle", "ladder",
      "lantern", "mirror", "needle", "notebook", "oven", "paddle", "pencil", "pillow", "plate", "pocket",
      "puzzle", "ribbon", "saddle", "scissors", "shovel", "spoon", "stapler", "teapot", "thimble", "towel",
      "trumpet", "umbrella", "violin", "wallet", "whistle", "wrench", "zipper", "bracelet", "cabinet",
      "funnel", "goblet", "hinge", "jar", "kite", "locket", "mitten", "napkin", "padlock", "quilt", "rake",
      "sandal", "skillet", "spindle", "tripod", "trowel", "vase", "wagon", "anvil", "barrel", "chisel",
      // places and buildings
      "attic", "bakery", "balcony", "barn", "bridge", "castle", "cellar", "chapel", "cottage", "factory",
      "fortress", "gallery", "garage", "hospital", "kitchen", "library", "lighthouse", "market", "museum",
      "palace", "pantry", "station", "stadium", "temple", "theater", "tower", "tunnel", "village", "warehouse",
      "workshop", "airport", "arcade", "cabin", "canal", "harbour", "plaza", "quarry", "school", "studio",
      // food
      "biscuit", "bread", "butter", "cheese", "cookie", "custard", "dumpling", "honey", "muffin", "noodle",
      "pancake", "pepper", "pickle", "pretzel", "pudding", "radish", "sausage", "spinach", "toast", "waffle",
      "yogurt", "almond", "carrot", "cabbage", "garlic", "ginger", "mango", "onion", "pumpkin", "turnip",
      // people and roles
      "baker", "captain", "dancer", "doctor", "farmer", "gardener", "hunter", "juggler", "knight", "merchant",
      "miner", "painter", "pilot", "poet", "sailor", "scholar", "shepherd", "singer", "soldier", "tailor",
      "teacher", "weaver", "wizard", "archer", "butcher", "carpenter", "drummer", "jeweler", "plumber",
      // abstract and misc nouns
      "harmony", "journey", "legend", "mystery", "riddle", "rhythm", "shadow", "silence", "spirit", "thunder",
      "treasure", "victory", "whisper", "wonder", "balance", "courage", "fortune", "memory", "promise",
      "signal", "puddle", "rocket", "planet", "comet", "galaxy", "meteor", "orbit", "crystal", "marble",
      "velvet", "silk", "copper", "silver", "bronze", "iron", "amber", "ivory", "pearl", "ruby", "emerald",
      "sapphire", "diamond", "quartz", "crayon", "canvas", "ballad", "banner", "beacon", "carnival", "circus",
      "festival", "parade", "picnic", "voyage", "harvest", "sunrise", "sunset", "rainbow", "tornado", "blizzard",
      // adjectives
      "ancient", "bitter", "bold", "brave", "bright", "broad", "calm", "careful", "cheerful", "clever",
      "cloudy", "crisp", "curious", "dusty", "eager", "early", "empty", "fancy", "fierce", "gentle", "giant",
      "golden", "graceful", "green", "happy", "heavy", "hollow", "humble", "icy", "jolly", "keen", "lazy",
      "little", "lively", "lonely", "loud", "lucky", "mellow", "merry", "mighty", "misty", "modern", "narrow",
      "noble", "odd", "orange", "patient", "plain", "polite", "proud", "purple", "quiet", "rapid", "rare",
      "rough", "round", "rusty", "sandy", "scarlet", "shallow", "sharp", "shiny", "silent", "simple", "sleepy",
      "slow", "smooth", "snowy", "soft", "sour", "spicy", "stormy", "strange", "sturdy", "sunny", "sweet",
      "swift", "tall", "tender", "thick", "tiny", "tired", "wild", "windy", "wise", "wooden", "yellow",
      "young", "zealous", "agile", "blunt", "breezy", "chilly", "dainty", "fragrant", "frosty", "glossy",
      "hasty", "nimble", "rustic", "serene", "vivid", "wary", "witty",
  };
  return words;
}

std::vector<std::string> pick_keys(Rng& rng, size_t count) {
  const auto& words = word_list();
  std::set<std::string> seen;
  std::vector<std::string> out;
  while (out.size() < count) {
    std::string key = fmt::format("{}-{}", words[rng.below(words.size())], words[rng.below(words.size())]);
    if (seen.insert(key).second) out.push_back(std::move(key));
  }
  return out;
}

std::string pick_number(Rng& rng, int digits, std::vector<std::string>& taken) {
  uint64_t low = 1;
  for (int i = 1; i < digits; ++i) low *= 10;
  for (;;) {
    std::string n = std::to_string(low + rng.below(9 * low));
    if (std::find(taken.begin(), taken.end(), n) == taken.end()) {
      taken.push_back(n);
      return n;
    }
  }
}

}  // namespace inferlab::tasks
