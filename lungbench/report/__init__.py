"""Layer 10 (report): tables (the seeds' layouts), plots, the HTML report and run comparison."""
