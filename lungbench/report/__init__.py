"""Layer 10 (report): tables (the seeds' layouts), plots, the HTML report and run comparison.

What may live here: what reads run folders and writes tables, plots and pages. What may not:
measuring or training (a report never runs the step), or torch where pandas will do.
"""
