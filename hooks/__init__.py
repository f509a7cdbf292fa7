"""Git hook installation: tiny sh hooks that spool commit notices for the daemon."""
