"""Report modules: one per study, turning a finished workdir into report.md + PNGs."""
