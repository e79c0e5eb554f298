"""Small papermill parameters for each notebook when it runs as a test (2 CPU cores, CI).

Each entry overrides the notebook's `parameters` cell. Keep the whole notebook chain well under
the 30-minute budget of the test command.
"""

CI_PARAMS: dict[str, dict] = {
    "00_synthetic_cohort": {"N_SUBJECTS": 16, "SEED": 0, "SIZE": "demo", "WORKERS": 2},
    "01_preprocessing": {"DATA_MANIFEST": "synthetic", "ATLAS": "auto", "SEGMENT_LUNGS": True, "WORKERS": 2, "PAD": 30},
    "02_pretraining": {"EPOCHS": 1, "BATCH_SIZE": 8, "LR": 1.6, "QUEUE_SIZE": 16, "WORKERS": 2, "MAX_STEPS": 40,
                       "LOG_EVERY": 1, "DEVICE": "cpu"},
    "03_embeddings": {"UMAP_MAX_POINTS": 1500, "METRIC_MAX_PATCHES": 6000, "INTERACTIVE": False, "SEED": 0},
    # the same pretraining budget as 02, so DrasCLR reuses 02's checkpoint and only the ablations train
    "04_downstream": {"FOLDS": 4, "PCA_COMPONENTS": 4, "EPOCHS": 1, "MAX_STEPS": 40, "BATCH_SIZE": 8, "LR": 1.6,
                      "QUEUE_SIZE": 16, "WORKERS": 2, "CALIBRATION_BATCHES": 8},
    # batch 4 x 30 steps left every init near the "every lung voxel" rule (Dice ~0.2); 8 x 80 learns
    "05_segmentation": {"FRACTIONS": "0.25,1.0", "SEEDS": 1, "STEPS": 80, "BATCH_SIZE": 8, "EVAL_PATCHES": 24,
                        "REAL_SCAN": True, "DEVICE": "cpu"},
}
