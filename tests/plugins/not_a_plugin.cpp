// A shared library that is not an inferlab plugin: the host must refuse it.
extern "C" __attribute__((visibility("default"))) int inferlab_test_not_a_plugin() { return 42; }
