"""Quality control: a chain of explicit, counted checks, each verdict with a reason code."""
