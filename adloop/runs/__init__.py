"""Multi-stage runs that assemble every stage: the demo loop and the evaluation through the real pipeline."""
