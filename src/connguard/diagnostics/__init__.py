"""Diagnostics: who holds which connection, read from the server's side.

``tags`` names each physical connection in ``application_name``; ``doctor`` reads
``pg_stat_activity`` and ``pg_settings`` and explains what it sees; ``status``
reports this process's pools and leases.
"""
