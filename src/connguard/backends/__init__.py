"""Django ``ENGINE`` packages: ``connguard.backends.<vendor>``."""
