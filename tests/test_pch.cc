// The object that carries the test binaries' precompiled header
// (tests/test_pch.h); it defines nothing.
