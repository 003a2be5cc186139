"""Training: data recording, codecs, teacher, causal students, evaluation."""
