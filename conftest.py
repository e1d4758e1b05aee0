# Makes the repository root importable in tests (data_prep, model, codistill, recipes).
