"""stainbridge.models: the networks, their checkpoints and the one inference path; training and
benchmarks in folders of their own.

    models/            what the service runs: cyclegan, colour_generator, classifier, small_resnet
                       (the networks), checkpoint (safetensors + JSON header), inference (load a
                       standardizer or classifier, score a batch), metrics
    models/imaging/    images and stain tools: labeled/unlabeled folders and splits (data), synthetic
                       smears, per-site geometry, classical stain normalization (Reinhard, Macenko),
                       stain augmentation
    models/training/   the training entry points (`stainbridge train classifier|cyclegan`), their loop
                       runtime and resumable state, and the semantic-consistency terms
    models/bench/      `stainbridge eval` and the benchmarks (`bench accuracy`, `bench throughput`)

Rules: nothing here imports ``stainbridge.daemon``; the networks and the inference path never import
training or bench code. The service reaches this package only through ``stainbridge.models.inference``
(tests/test_layout.py keeps these true).
"""
