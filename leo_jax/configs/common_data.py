"""Data pipeline options shared by every preset (``config.data`` in the training presets).

Presets compose this: ``data = common_data.get_config(); data.seq_len = 2048; ...``. Facts of the model (tile px,
encoder preprocessors, visual tokens per tile / image) are not here: the pipeline takes them from the model config
(``leo_jax.data.visual``). Everything is consumed by ``leo_jax.data.pipeline``.
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()

    # --- where the data is ---------------------------------------------------------------------------------------
    # Comma-separated list of LLaVA .json (array) / .jsonl annotation files or TFDS ArrayRecord dataset directories
    # (written by `python -m leo_jax.data.to_arrayrecord`); several are read back to back as one data set.
    c.train_files = ""
    # Directory the records' `image` paths are relative to; "" = each annotation file's own directory.
    c.image_root = ""
    c.eval_files = ""
    c.eval_image_root = ""
    c.split = "train"  # split name inside ArrayRecord dataset directories

    # --- text ----------------------------------------------------------------------------------------------------
    c.tokenizer = ""  # tokenizer.json / SentencePiece .model / directory holding one
    # Conversation template: 'leo_internlm2_chat' (LEO), 'internlm2_chat' (generic ChatML), 'llama3' (LEO-MINI
    # Llama3-8B), 'vicuna_v1', 'plain' (projector pre-training: image + caption, caption supervised).
    c.template = "internlm2_chat"
    c.seq_len = 8192  # row capacity in tokens (LEO SFT: 8192; LEO-MINI: 2048); longer samples are skipped
    # Optional increasing padded lengths ending at seq_len, e.g. (1024, 2048, 4096, 8192): a batch is padded to the
    # smallest bucket >= its longest row (one bucket per batch -> at most len(seq_buckets) compiled shapes).
    # Empty: every batch is padded to seq_len (one compiled shape; the default).
    c.seq_buckets = ()

    # --- batching ------------------------------------------------------------------------------------------------
    c.global_batch_size = 128  # rows per step over all processes; each process builds global/process_count rows
    c.eval_batch_size = 8  # global, for the eval iterator
    # Packing: several samples per row (first fit), separated by segment_ids, positions restart per sample.
    c.packing = False
    c.max_samples_per_row = 8  # with packing; 1 sample per row otherwise

    # --- order, determinism and throughput -----------------------------------------------------------------------
    c.seed = 0  # fixes the shuffle order of every epoch and every random augmentation
    c.shuffle = True
    # None repeats forever and the step count ends training: use that on multi-host runs, where processes may
    # otherwise run out of data at different steps (their shards differ by one record and by skips).
    c.num_epochs = 1
    # Worker processes for decoding / tiling / tokenising (0 = in the main process). The batch order does not depend
    # on it. Scripts using workers need an `if __name__ == "__main__":` guard.
    c.num_workers = 0
    c.worker_buffer_size = 4  # samples each worker prepares ahead
    c.read_threads = 2  # threads per process reading + transforming samples
    c.read_buffer_size = 16  # samples prefetched by those threads

    # --- bad input -----------------------------------------------------------------------------------------------
    # A record with a missing/corrupt image, malformed JSON, more <image> tags than images, too many tokens or
    # images, or no supervised token is skipped, counted per reason and logged with its file and line/record.
    # The run stops with an error once skipped/seen exceeds max_skip_fraction, checked after min_records_checked
    # records (so a handful of early skips does not stop a run, but a wrong image_root does, quickly).
    c.max_skip_fraction = 0.01
    c.min_records_checked = 200
    # A second, windowed limit: stop once more than max_window_skip_fraction of the last skip_window records were
    # skipped (a bad shard after millions of good records never moves the cumulative fraction). 0 = off.
    c.skip_window = 1000
    c.max_window_skip_fraction = 0.1

    # Visual budget: tiles (LEO) / images (LEO-MINI) the encoders run on per global batch, instead of every slot
    # (rows x slots per row; a text-only row's empty slots are skipped). -1 = every slot. The rows split into one
    # group per device block of the batch axis and micro-batch, each with an equal share, so each device encodes
    # its own rows' items; a training sample that would overflow its group's share is skipped and counted
    # (over_visual_budget) without packing, or waits for the next batch with packing. Default -1: the recipes'
    # pod meshes hold 1-2 rows per device, where a share below the slots of one full row (7 tiles for a 6-tile
    # image) would skip most image samples of LLaVA-style data (~94% image rows, most of them 6 tiles + thumbnail);
    # set it when a device holds several rows (e.g. 0.95 x rows x slots).
    c.visual_budget = -1

    # --- LEO: adaptive tiling, InternViT + SAM per tile (the official LEO code) -----------------------------------
    c.leo = ml_collections.ConfigDict()
    # SAM host input px: each tile resized to this (longest side) and padded square. 0 = the tile size, enlarged to
    # SAM's input on device (PIL-exact), ~5x fewer host->device bytes than 1024 px tiles.
    c.leo.sam_size = 0
    c.leo.min_tiles = 1
    c.leo.max_tiles = 6  # per sample; split over its images (max_tiles // n_images each), + 1 thumbnail per image
    c.leo.use_thumbnail = True
    # Images per sample the rows are sized for: n images get max_tiles // n tiles each + a thumbnail each (the
    # official rule), so 6 tiles need 7 slots for one image, 8 for two, 9 for three. Samples with more images are
    # kept when their tiles fit, else skipped and counted (too_many_images).
    c.leo.max_images_per_sample = 1
    # K: tile slots per batch row; -1 = derived from max_tiles, max_images_per_sample and use_thumbnail (checked at
    # start: an explicit value must be at least that); more when packing several samples per row.
    c.leo.max_tiles_per_row = -1
    c.leo.jpeg_augment = True  # random JPEG re-encoding of the InternViT tiles, training only (LEO recipe)
    c.leo.jpeg_quality_range = (75, 100)  # inclusive, as InternVL's simulate_jpeg_degradation

    # --- LEO-MINI: several vision experts (their preprocessors come with the model's experts) -----------------------
    c.leo_mini = ml_collections.ConfigDict()
    c.leo_mini.max_images_per_row = 1  # M: image slots per batch row (more for multi-image data or packing)
    return c
