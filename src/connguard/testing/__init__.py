"""Tools for testing code that uses connguard, in your own test suite too."""
