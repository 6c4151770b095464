"""A new model's way onto a running car: shadow trial, activation while stopped, probation, rollback."""
