"""Django's side of connguard: the ``DatabaseWrapper`` mixin, request scopes,
system checks and middleware.

Add ``"connguard.django"`` to ``INSTALLED_APPS`` for the system checks; the
``ENGINE`` works without it.
"""
