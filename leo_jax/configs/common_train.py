"""Trainer options shared by every training preset (``config.train``), read by ``leo_jax.train``.

Presets compose this: ``config.train = common_train.get_config(); config.train.learning_rate = 2e-5; ...``.
The global batch size is ``config.data.global_batch_size`` (rows per optimizer step, over all processes).
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()

    # --- length of the run ---------------------------------------------------------------------------------------
    # Optimizer steps. -1 = one pass over data.train_files x data.num_epochs, counted from the annotation files at
    # start (both recipes train 1 epoch); packing makes the number of batches unknown, so give steps explicitly then.
    c.steps = -1

    # --- optimizer: AdamW ----------------------------------------------------------------------------------------
    c.learning_rate = 2e-5
    c.schedule = "cosine"  # 'cosine' (to final_lr_fraction * learning_rate) or 'constant', both after warm-up
    c.warmup_fraction = 0.03  # linear warm-up from 0 over this fraction of the steps (both papers: 3%)
    c.final_lr_fraction = 0.0
    # Decoupled weight decay, chosen per parameter by its role (set where the parameter is created, never guessed
    # from its rank): kernels, embeddings, LoRA factors, CoTR queries, position tables, CLS tokens and layer scales
    # decay; the roles listed here do not. Default: every bias and norm scale exempt, the rule of the Hugging Face
    # Trainer the LLaVA / InternVL recipes ran with. Roles: kernel, bias, norm, embedding, position, token,
    # layer_scale, query, lora.
    c.weight_decay = 0.0
    c.no_decay_roles = ("bias", "norm")
    c.adam_b1 = 0.9
    c.adam_b2 = 0.999
    c.adam_eps = 1e-8
    c.grad_clip_norm = 1.0  # global-norm clipping of the trainable gradients (0 = off)
    # The global batch is split into this many micro-batches inside the jitted step (lax.scan, gradients summed).
    c.grad_accum_steps = 1

    # --- which parameters train ----------------------------------------------------------------------------------
    # Regular expressions matched (re.fullmatch) against parameter paths such as 'llm/layers/attn/q_proj/kernel'
    # or 'experts/clip/...'. A parameter trains iff it matches a `trainable` pattern and no `frozen` pattern; each
    # pattern must match at least one parameter. Frozen parameters get no gradient and no optimizer state.
    c.trainable = (".*",)
    c.frozen = ()

    # --- loss ----------------------------------------------------------------------------------------------------
    c.balance_loss_weight = 0.05  # x mean over layers of the MMoE balance loss (LEO-MINI; Switch-style, weight 0.05)

    # --- initialisation from converted checkpoints ---------------------------------------------------------------
    # Module path -> checkpoint directory: a leo_jax checkpoint (`python -m leo_jax.convert import-hf`) or a Hugging
    # Face directory (config.json + safetensors), e.g. {'llm': '/ckpt/llama3_8b', 'experts/clip': '/ckpt/clip'}.
    # Loaded once at the start of a fresh run (a resumed run restores its own checkpoint instead).
    c.init = ml_collections.ConfigDict()

    # --- logging, evaluation, checkpoints ------------------------------------------------------------------------
    c.log_every = 10  # steps between log lines / metric records (the only host synchronisation of the loop)
    c.eval_every = 0  # steps between evaluations on data.eval_files (0 = at the end only, if eval_at_end)
    c.eval_at_end = True
    c.eval_max_batches = -1  # -1 = the whole validation split
    c.eval_max_new_tokens = 16  # greedy answer length limit
    c.checkpoint_every = 500
    c.keep_checkpoints = 3  # the newest N are kept
    c.async_checkpoint = True  # write in the background while training continues
    # Resume from this saved step instead of the newest (-1); newer checkpoints are moved to
    # WORKDIR/checkpoints_set_aside/, not deleted. E.g. after a loss blow-up, to go back before it.
    c.resume_step = -1
    # An unreadable newest checkpoint is moved aside (with a warning) and the previous one used; False = stop instead.
    c.checkpoint_fallback = True
    # Resuming refuses changes to the fields that fix the saved data position and the schedule (data files, seeds,
    # batch size, seq_len, packing, epochs, steps, schedule shape); True accepts them (with a warning).
    c.allow_config_change = False
    # Peak FLOP/s of one device for the MFU estimate; 0 = look the device kind up (TPU v4/v5e/v5p/v6e, A100, H100,
    # H200); unknown kinds (e.g. CPU) log no MFU.
    c.peak_flops_per_device = 0.0
    return c
