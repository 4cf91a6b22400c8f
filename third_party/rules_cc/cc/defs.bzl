"""Offline stand-in for @rules_cc//cc:defs.bzl: Bazel's native C++ rules.

Bazel 4 loads "@rules_cc//cc:defs.bzl" from its own generated C++ toolchain
(@local_config_cc) and, unless the WORKSPACE defines @rules_cc, downloads the
rules_cc archive for it. This repository (local_repository in WORKSPACE)
answers those loads with the rules built into Bazel 4, which is all that
rules_cc's defs.bzl wraps, so nothing is downloaded.
"""

def cc_binary(**attrs):
    native.cc_binary(**attrs)

def cc_import(**attrs):
    native.cc_import(**attrs)

def cc_library(**attrs):
    native.cc_library(**attrs)

def cc_proto_library(**attrs):
    native.cc_proto_library(**attrs)

def cc_shared_library(**attrs):
    native.cc_shared_library(**attrs)

def cc_test(**attrs):
    native.cc_test(**attrs)

def cc_toolchain(**attrs):
    native.cc_toolchain(**attrs)

def cc_toolchain_suite(**attrs):
    native.cc_toolchain_suite(**attrs)

def fdo_prefetch_hints(**attrs):
    native.fdo_prefetch_hints(**attrs)

def fdo_profile(**attrs):
    native.fdo_profile(**attrs)

def objc_import(**attrs):
    native.objc_import(**attrs)

def objc_library(**attrs):
    native.objc_library(**attrs)
