"""Hostile files and inputs: every kind a stranger's file, a damaged disk or a scraped folder can bring,
through the command line (one line, exit code 2, nothing left on disk) and the library (the precise error)."""
