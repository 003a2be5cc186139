"""Causal few-step students: causal teacher, TF-CM (dCM, sCM), SF-DMD; one module per stage."""
