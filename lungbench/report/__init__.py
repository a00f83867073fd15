"""Tables (the seeds' layouts), plots, the HTML report and run comparison."""
