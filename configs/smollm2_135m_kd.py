"""Token-level (KD) training of an EAGLE-3-style drafter for SmolLM2-135M-Instruct.

python -m ppow_jax.distill --config configs/smollm2_135m_kd.py   # the target answers the prompts
python -m ppow_jax.train --config configs/smollm2_135m_kd.py     # the drafter learns from it
Any value can be overridden: --config.train.steps=2000 --config.data.max_prompts=4096.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.target = "smollm2-135m-instruct"
    config.param_dtype = "float32"
    # Data root (data README): `train/` prompts and `eval/` question sets; env PPOW_DATA_ROOT wins.
    config.data_root = "../shared/data"
    config.stage = "kd"  # token-level training (configs/smollm2_135m_ppow.py: "ppow")
    config.workdir = "runs/smollm2-135m-instruct/kd"
    # A drafter directory to continue from (continued token-level training, the CST baseline);
    # empty: train from scratch.
    config.init_from = ""
    config.seed = 0
    config.export_dtype = "bfloat16"  # the exported drafter's storage dtype (computation runs in the target's)

    config.data = ml_collections.ConfigDict()
    config.data.folders = ("sharegpt", "alpaca_cleaned_1k", "alpaca_en_demo", "alpaca_seed_tasks", "gsm8k_train",
                           "c4_demo", "wiki_demo")
    # Optional extra prompts from a dataset already prepared with TFDS (`pip install -e '.[tfds]'`).
    config.data.tfds = ml_collections.ConfigDict({"name": "", "split": "train", "field": "text", "data_dir": ""})
    config.data.cache_dir = "runs/smollm2-135m-instruct/distill"
    config.data.max_prompts = 2048  # a seeded sample of the ~13k prompts (0: all); extend later, the cache resumes
    # Per-source caps on the training prompts (0: none), to rebalance the mix: the prompt pool is 56%
    # gsm8k_train and no source is code. With a cap equal to a source's count in the cache, raising
    # max_prompts extends the cache with the other sources only (a lower cap is refused). Only the
    # default folders can be capped from the command line.
    config.data.source_caps = ml_collections.ConfigDict({folder: 0 for folder in config.data.folders})
    # Training prompts passed over at the start of the shuffle (under the caps), with a cache_dir of
    # its own: 4096 takes the prompts after those the committed drafter was trained on (PPOW, tenth round).
    config.data.skip_prompts = 0
    # Comma-separated distillation caches whose prompts "train" passes over (before caps and skip),
    # with a cache_dir of its own: a pool that no earlier cache holds, whatever caps and skips those
    # were made under. Prompts they skipped as too long are not passed over (they are skipped again).
    config.data.exclude_caches = ""
    # Held-out prompts (the last of the seeded shuffle, never trained on): training logs the greedy
    # acceptance of drafts on their responses every train.eval_every steps. 0: no dev split.
    config.data.dev_prompts = 64
    config.data.dev_cache_dir = "runs/smollm2-135m-instruct/distill-dev"
    config.data.dev_features_dir = ""  # empty: WORKDIR/features-dev
    config.data.max_prompt_tokens = 384
    config.data.max_new_tokens = 256
    config.data.temperature = 0.0  # the target's greedy answers
    config.data.top_p = 1.0
    # Who answers the training prompts: "target" (self-distillation) or "reference" (the records' own
    # answers: Alpaca outputs, GSM8K answers, the rest of web texts; no generation, ShareGPT has none).
    # The dev split is always the target's. A reference cache needs its own data.cache_dir.
    config.data.responses = "target"
    config.data.batch_size = 32
    config.data.seq_len = 384  # training sequences: prompt + response, the last seq_len tokens, right-padded
    config.data.num_epochs = 0  # 0: repeat until train.steps
    config.data.read_ahead = 2  # training batches prepared in the background (each holds features: MBs per sequence)
    config.data.feature_batch_size = 8  # sequences per target forward when caching features
    config.data.features_dir = ""  # the target-feature cache; empty: WORKDIR/features
    # More self-distilled caches of this target to train on beside cache_dir, mixed in one shuffle:
    # comma-separated DISTILL_DIR:FEATURES_DIR pairs (each feature cache is built on first use), e.g. a
    # distillation of new prompts made with data.skip_prompts or data.exclude_caches. Their prompts must
    # differ from cache_dir's.
    config.data.extra_caches = ""

    config.drafter = ml_collections.ConfigDict()
    config.drafter.kind = "eagle3"
    config.drafter.feature_layers = (2, 15, 27)  # low, middle, high layers of the 30-layer target (EAGLE-3)
    config.drafter.draft_vocab_size = 8192  # most frequent target tokens in the self-distilled data
    config.drafter.intermediate_size = 1536

    config.train = ml_collections.ConfigDict()
    config.train.batch_size = 4  # the global batch: with several hosts each loads its share
    # These defaults give the first stage of the committed drafter (checkpoints/smollm2-135m-instruct/kd):
    # 1,800 steps, 3.6 epochs of the 2,048-prompt distillation, 80 minutes on a 2-core CPU; its second
    # stage continues on the 4,096-prompt distillation (README). On a GPU raise steps and unroll_steps.
    config.train.steps = 1800
    config.train.unroll_steps = 3  # training-time test: drafter steps fed its own hidden state (EAGLE-3: 5)
    config.train.loss_positions = 1024  # response positions per batch that get the head and the loss (0: all)
    config.train.learning_rate = 1e-3  # EAGLE-3 uses 5e-5 for long runs; a short run from scratch needs more
    config.train.warmup_steps = 20
    config.train.end_learning_rate_factor = 0.1
    config.train.b1 = 0.9
    config.train.b2 = 0.95  # EAGLE-3's AdamW betas
    config.train.weight_decay = 0.0
    config.train.grad_clip = 0.5  # EAGLE-3's clip
    config.train.log_every = 5
    config.train.checkpoint_every = 50
    config.train.keep_checkpoints = 3
    # The dev-split probe (data.dev_prompts): greedy windows of eval_window drafts at every
    # eval_stride-th position, every eval_every steps (0: only at the start and the end); not
    # counted in train.max_seconds.
    config.train.eval_every = 100
    config.train.eval_window = 5
    config.train.eval_stride = 8
    config.train.max_seconds = 0.0  # training-time budget in seconds (0: none); the run exports when it is spent
    # Wall-clock budget of this run in seconds, data waits and probes included (0: none), for a leased machine.
    config.train.max_wall_seconds = 0.0
    config.train.mesh = ""  # e.g. "data=8" on a pod slice; default one device (several hosts: data over all)
    # Several hosts (launch/tpu_pod.sh): one process per host, started alike; enabled=True calls
    # jax.distributed.initialize, which finds the rest on Cloud TPU, SLURM, Open MPI and Kubernetes.
    # Elsewhere set all three (CPU hosts talk through gloo). train.mesh must span every host's devices.
    config.distributed = ml_collections.ConfigDict(
        {"enabled": False, "coordinator_address": "", "num_processes": 0, "process_id": -1})

    # The adaptive window's calibration, fitted on greedy windows of the training data at export.
    config.calibration = ml_collections.ConfigDict()
    config.calibration.batches = 4
    config.calibration.batch_size = 2
    config.calibration.window = 10
    return config
