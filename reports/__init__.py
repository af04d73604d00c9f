"""convlens.reports: static HTML reports over an engine run directory."""
