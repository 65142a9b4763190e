"""The embedded SQLite storage: one file per store under the workspace, one process (the
workspace lock), one shared group-commit writer thread per file (:mod:`.writer`)."""
