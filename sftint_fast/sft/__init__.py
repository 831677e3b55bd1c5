"""SFT tracking: probes, the tracker, noise floors, the TrainerCallback (METHOD.md sections 6 and 7)."""
