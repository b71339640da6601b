"""Training/eval data: readers, prompt building, feature cache."""
