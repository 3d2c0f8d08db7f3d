"""Reports: diagnostics, analysis, plots, comparing runs."""
