"""The typed config tree. Every field has a one-line docstring (the comment above it) and a
default; validation lives in `validate.py`, loading in `load.py`."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ModelConfig:
    # timm model name of the backbone (random init); any timm name works.
    backbone: str = "vit_base_patch16_224"
    # Side of the square crop the backbone sees.
    image_size: int = 224
    # Projection head: "mlp_bn" (the paper's, BatchNorm per view chunk) or "mlp_ln" (LayerNorm).
    head: str = "mlp_bn"
    # Hidden width of the projection head MLP.
    head_hidden_dim: int = 4096
    # Output dimension of the projection head (the contrastive embedding).
    embed_dim: int = 256
    # Stochastic depth rate of the backbone.
    drop_path_rate: float = 0.0
    # StableRep++: add a text tower and the image-text contrastive term.
    text_tower: bool = False
    # Width of the text transformer.
    text_width: int = 512
    # Layers of the text transformer.
    text_layers: int = 12
    # Attention heads of the text transformer.
    text_heads: int = 8
    # Maximum number of text tokens (CLIP's 77).
    text_context_length: int = 77
    # MLP activation of the text tower: "quick_gelu" (the official StableRepMM's and CLIP's,
    # x * sigmoid(1.702 x)) or "gelu".
    text_activation: str = "quick_gelu"
    # Width of StableRep++'s image-text space: the bias-free linear image and text projections
    # map to it (official 512; the multi-positive term keeps model.embed_dim).
    image_text_dim: int = 512


@dataclass
class LossConfig:
    # Softmax temperature tau of the multi-positive contrastive loss.
    temperature: float = 0.1
    # Weight of the image-image multi-positive term.
    image_weight: float = 1.0
    # Weight of the StableRep++ image-text term (used only with model.text_tower).
    text_weight: float = 1.0


@dataclass
class AugmentConfig:
    # Lower bound of RandomResizedCrop's area fraction.
    crop_scale_min: float = 0.08
    # Upper bound of RandomResizedCrop's area fraction.
    crop_scale_max: float = 1.0
    # Probability of applying colour jitter.
    color_jitter_p: float = 0.8
    # Colour jitter strength for brightness.
    brightness: float = 0.4
    # Colour jitter strength for contrast.
    contrast: float = 0.4
    # Colour jitter strength for saturation.
    saturation: float = 0.4
    # Colour jitter strength for hue (at most 0.5).
    hue: float = 0.1
    # Probability of converting a view to grayscale.
    grayscale_p: float = 0.2
    # Probability of a Gaussian blur.
    blur_p: float = 0.5
    # Smallest Gaussian blur sigma, as a fraction of a 224 px image's scale (paper: 0.1).
    blur_sigma_min: float = 0.1
    # Largest Gaussian blur sigma (paper: 2.0).
    blur_sigma_max: float = 2.0
    # Probability of a horizontal flip.
    flip_p: float = 0.5
    # Probability of the "downsample" augmentation: the whole image shrinks to one of
    # downsample_sizes and back before the crop (official order and sizes).
    downsample_p: float = 0.0
    # Sizes of the downsample augmentation, in px of a 256 px image (scaled with the stored
    # image size), drawn uniformly.
    downsample_sizes: list[int] = field(default_factory=lambda: [64, 128])
    # Normalisation mean (ImageNet).
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    # Normalisation std (ImageNet).
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])


@dataclass
class BatchConfig:
    # n: distinct caption groups per batch on each trainer rank.
    captions_per_batch: int = 43
    # k: views (images) drawn from each caption group per batch.
    views_per_caption: int = 6
    # What the k views of a group are: "caption" (k different images of the caption, the
    # paper's multi-positive loss) or "image" (k augmentations of one image of the group:
    # SimCLR's positives, the paper's baseline on the same images).
    positives: str = "caption"


@dataclass
class OptimConfig:
    # The official --blr: peak lr = base_lr * images per step (all trainers) / 256 / 2, the
    # official rule with num_crop = 1 (3.225e-3 for 43 captions x 6 images x 32 ranks).
    base_lr: float = 2.0e-4
    # Absolute learning rate; overrides base_lr scaling when > 0.
    lr: float = 0.0
    # AdamW beta1.
    beta1: float = 0.9
    # AdamW beta2.
    beta2: float = 0.98
    # AdamW weight decay (not applied to biases and norm parameters).
    weight_decay: float = 0.1
    # Linear warm-up steps before the cosine decay (0 = from train.warmup_epochs at start).
    warmup_steps: int = 0
    # Final learning rate as a fraction of the peak.
    min_lr_ratio: float = 0.0
    # Gradient clipping by global norm; 0 disables it.
    grad_clip: float = 0.0
    # torch's fused AdamW kernel (one kernel for all parameters, CUDA and CPU; fp32 master
    # weights either way); false: the multi-tensor foreach implementation.
    fused: bool = True


@dataclass
class TrainConfig:
    # Total optimizer steps (0 = train.schedule_epochs passes over the caption corpus, resolved
    # at start from the corpus size, trainer ranks and batch; config.yaml records the result).
    steps: int = 0
    # Schedule length in passes over the caption corpus, the official --epochs (1x = 15, 3x =
    # 45); a pass uses every caption's group once. Used when train.steps is 0.
    schedule_epochs: float = 15.0
    # Warm-up in passes over the corpus, the official --warmup_epochs (1x: 0.5). Used when
    # optim.warmup_steps is 0; with an explicit train.steps, as the same share of the schedule.
    warmup_epochs: float = 0.5
    # Producers stop after this many passes over the caption corpus, each generating new
    # images (0 = no limit, train.steps decides).
    epochs: int = 0
    # End this run after this many steps, checkpointing there (0 = run to train.steps); the
    # schedule still spans train.steps, so a time-limited allocation resumes seamlessly.
    stop_after: int = 0
    # "auto" (bf16 on GPU, fp32 on CPU), "bf16" (DeepSpeed bf16: bf16 weights and gradients,
    # fp32 master weights), "autocast_bf16" (as the official code: fp32 weights and gradients,
    # forward under bf16 autocast) or "fp32" (docs/paper-parity.md).
    precision: str = "auto"
    # DeepSpeed ZeRO stage (0 or 1).
    zero_stage: int = 0
    # Print a console line and write scalars every this many steps.
    log_every: int = 50
    # Save a checkpoint every this many steps (0 = only at the end).
    checkpoint_every: int = 5000
    # Also save a checkpoint once this many minutes passed since the last one (0 = off): the
    # work a crash loses is bounded in time, whatever a step costs. Trainer ranks agree on it.
    checkpoint_every_minutes: float = 0.0
    # Keep this many newest checkpoints.
    keep_checkpoints: int = 2
    # Write an image grid of received caption groups every this many steps (0 = never).
    image_grid_every: int = 1000
    # On a non-finite loss: "stop" (raise naming the step) or "skip" (drop the step).
    on_nonfinite: str = "stop"
    # Torch threads per process on CPU (0 = leave torch's default).
    cpu_threads: int = 0
    # torch.compile the model (backbone and the per-view-chunk BatchNorm head) before the
    # DeepSpeed engine wraps it: a warm-up of tens of seconds, then faster steps on GPUs.
    compile: bool = False
    # Write every batch's caption ids and each group's use count to output_dir/audit/ at the
    # end (for tests and debugging: grows with the run).
    audit: bool = False


@dataclass
class ProducerConfig:
    # Which producer makes caption groups: "procedural", "diffusion" or "shards" (stored groups).
    kind: str = "diffusion"
    # Images generated per caption (the group size; the paper makes 10).
    images_per_caption: int = 10
    # Side of the stored square uint8 images.
    output_size: int = 256
    # Captions per producer call (one batched call makes captions x images).
    captions_per_call: int = 4
    # Base seed of generation; a group is a pure function of (seed, caption id, image index).
    seed: int = 0


@dataclass
class ProceduralConfig:
    # Number of fractal categories ("captions").
    num_categories: int = 100
    # Side of the rendered image before resizing to producer.output_size.
    render_size: int = 64
    # Points iterated per render (more = denser fractals, slower).
    num_points: int = 6000
    # Affine maps per iterated function system.
    num_maps: int = 4


@dataclass
class GeneratorConfig:
    # Named sampler recipe (config/recipes.py, docs/recipes.md): "" (none: every key as given),
    # "paper" (the official DDIM-50), "dpm20", "fast" or "turbo". Keys given explicitly
    # (override) win over the recipe's.
    recipe: str = ""
    # Diffusers checkpoint (local dir or hub id), "toy" (the trained toy model shipped in the
    # package, docs/toy-model.md) or a random-weight architecture: "tiny", "sd15", "sd21", "sdxl".
    model: str = "sd15"
    # Scheduler: "dpm++", "unipc", "euler", "ddim", "lcm", "tcd".
    scheduler: str = "dpm++"
    # Scheduler timestep spacing: "" (the checkpoint's), "leading", "trailing" or "linspace".
    timestep_spacing: str = ""
    # TCD scheduler stochasticity eta in [0, 1] (more = more fresh noise per step, more diverse).
    tcd_eta: float = 0.3
    # DDIM eta in [0, 1] (used only with scheduler ddim): 0 is deterministic DDIM, the official
    # generation's --ddim_eta; 1 is DDPM-like ancestral sampling.
    ddim_eta: float = 0.0
    # Denoising steps.
    steps: int = 20
    # Guidance: "small" [2,3], "large" [8,10], "mixed", a list "2,3,4", or one value "2.0".
    guidance: str = "2.0"
    # Generation resolution in pixels (0 = the model's native size).
    resolution: int = 0
    # "auto" (bf16 on GPU, fp32 on CPU), "bf16", "fp16" or "fp32".
    dtype: str = "auto"
    # Attention backend: "sdpa" or "xformers".
    attention: str = "sdpa"
    # Use channels_last memory format for UNet and VAE. Off by default: measured 0.89x of
    # contiguous for SD1.5's UNet on an H100 in bf16 (benchmarks/generator.py --scenarios
    # stock,channels_last).
    channels_last: bool = False
    # torch.compile the UNet with fixed shapes (the last batch is padded).
    compile: bool = False
    # torch.compile mode: "default", "reduce-overhead" (CUDA graphs at the fixed shapes),
    # "max-autotune" or "max-autotune-no-cudagraphs".
    compile_mode: str = "default"
    # Fuse each attention's q, k, v projections into one matmul (diffusers fuse_qkv_projections).
    fuse_qkv: bool = False
    # LoRA adapter (local dir, .safetensors file or hub id) loaded with load_lora_weights and
    # fused into the UNet, e.g. LCM-LoRA, TCD-LoRA, Hyper-SD ("" = none).
    lora: str = ""
    # File name of the adapter inside `lora` when it holds several ("" = diffusers' default).
    lora_weight_name: str = ""
    # Scale the adapter is fused with.
    lora_scale: float = 1.0
    # Distilled UNet (diffusers UNet folder or hub id, e.g. an LCM UNet) replacing the
    # checkpoint's UNet ("" = none).
    unet: str = ""
    # The first steps run the base UNet with guidance, the rest the distilled one (lora or
    # unet): few-step diversity of arXiv 2503.10637. 0 = every step distilled.
    base_steps: int = 0
    # Classifier-free guidance only on steps i with lo <= i/steps < hi (arXiv 2404.07724);
    # other steps make one conditional pass. [0, 1] = every step.
    guidance_interval: list[float] = field(default_factory=lambda: [0.0, 1.0])
    # DeepCache: run the full UNet every N steps, only its shallowest blocks with cached deep
    # features in between (arXiv 2312.00858). 1 = off.
    deep_cache_every: int = 1
    # Images per VAE decode call (bounds memory; 0 = all at once).
    vae_decode_chunk: int = 8
    # AutoencoderTiny to decode with: local dir or hub id, e.g. madebyollin/taesd ("" = the
    # model's own VAE).
    tiny_vae: str = ""
    # Negative prompt used for the unconditional branch of classifier-free guidance.
    negative_prompt: str = ""


@dataclass
class CaptionsConfig:
    # Caption corpus: a .txt/.csv/.tsv/.parquet file or a directory of them ("" = the packaged
    # demo captions; "toy" / "toy_colours" = the packaged captions of the toy model's world).
    path: str = ""
    # Column holding the caption in .csv/.tsv/.parquet files.
    column: str = "caption"
    # Skip (and count) bad rows instead of failing.
    skip_bad_rows: bool = False
    # Shuffle caption order per epoch (from producer.seed and the epoch number).
    shuffle: bool = True


@dataclass
class ShardsConfig:
    # Caption groups kept as WebDataset tar shards: written by one run, read by a later one.
    # Also write every caption group the producers make to shards in this folder ("" = off).
    write_dir: str = ""
    # Image encoding inside written shards: "png" (lossless), "jpg" or "webp".
    image_format: str = "png"
    # Encoder quality of jpg/webp images, 1-100 (png is lossless and ignores it).
    quality: int = 95
    # Caption groups per written shard file; the last shard of a run may hold fewer.
    groups_per_shard: int = 1000
    # Groups waiting for the background writer at most; a producer that gets further ahead waits.
    queue_groups: int = 64
    # With producer.kind=shards: the shards to read, a folder of .tar files or a glob of them
    # (e.g. "dir/*.tar").
    path: str = ""
    # Skip (count and log) unreadable samples and the unreadable rest of a corrupt shard instead
    # of failing.
    skip_bad_samples: bool = False
    # Stored images of another size than producer.output_size: resize them (shorter side, then
    # centre crop) instead of failing.
    resize: bool = False
    # Shuffle the order of this rank's shard files every epoch (from producer.seed and the epoch).
    shuffle_files: bool = True


@dataclass
class RolesConfig:
    # Generator ranks in the job: a total count ("2") or a count per node ("1/node");
    # "0" is colocated mode where every rank trains and runs its own producer.
    generators: str = "0"
    # What losing a generator rank (its process dies, it fails, or it falls silent past
    # transport.timeout_s) does: "stop" ends the job; "continue" names it and trains on with the
    # others (docs/restarts.md). Losing a trainer always ends the job.
    on_generator_loss: str = "stop"
    # With on_generator_loss=continue: a trainer idle more than this share of the time since a
    # generator was lost ends the job (too few generators left); 1.0 = only when none is left.
    max_idle_after_loss: float = 0.9


@dataclass
class ReplayConfig:
    # Caption groups each trainer holds at most.
    capacity: int = 512
    # Maximum times one group is used in a batch (1 = pure online).
    max_reuse: int = 4
    # Eligible groups a batch is drawn from at least; the trainer waits (idle) below it rather
    # than repeat the previous batch. 0 = auto: 4 x captions_per_batch (captions_per_batch when
    # max_reuse is 1), so consecutive batches share about a quarter of their captions.
    min_pool: int = 0
    # Draw weight of a never-used group relative to a used one (1 = uniform random draws).
    fresh_weight: float = 1.0
    # How a batch is drawn: "random" (from the pool above) or "sequential" (the old rule:
    # unused groups first, then least used, oldest first, min_pool n; kept for comparison).
    draw: str = "random"
    # Save the held groups in checkpoints, so a resumed run loses nothing it had received
    # (costs capacity x group size of disk per trainer rank).
    checkpoint_contents: bool = True


@dataclass
class TransportConfig:
    # Caption-group slots a trainer grants each generator at a time.
    credits_per_generator: int = 8
    # Seconds any rank waits for a peer before failing with a message naming it.
    timeout_s: float = 120.0
    # Seconds a rank may take to build and warm up its model (generators keep saying "alive,
    # warming up" meanwhile); the trainers wait this long for the first group.
    startup_timeout_s: float = 900.0
    # Seconds trainer ranks wait for each other at checkpoint barriers (one rank writing a large
    # replay buffer slowly must not fail the job).
    collective_timeout_s: float = 1800.0


@dataclass
class PlanConfig:
    # Generator images/s per GPU the job was planned with (0 = no plan: nothing compared).
    gen_images_per_s: float = 0.0
    # Trainer views/s per GPU the job was planned with.
    train_images_per_s: float = 0.0
    # Whether those figures were "measured" or "estimated" (shown in the comparison).
    source: str = "measured"


@dataclass
class EvalConfig:
    # Run the linear probe and k-NN at the end of training.
    probe_at_end: bool = False
    # "procedural" (held-out renders) or the path of an ImageFolder root with train/ and val/.
    dataset: str = "procedural"
    # Named transfer suite probed instead of eval.dataset ("" = none), e.g. "procedural100":
    # its own images and protocol, few-shot episodes included (docs/evaluation.md).
    suite: str = ""
    # Folder keeping a suite's rendered images between processes ("" = render once per process).
    cache_dir: str = ""
    # Procedural probe: training images per class.
    train_per_class: int = 10
    # Procedural probe: test images per class.
    test_per_class: int = 5
    # Linear probe learning rates swept.
    lrs: list[float] = field(default_factory=lambda: [0.1, 0.03, 0.01])
    # Linear probe weight decays swept.
    weight_decays: list[float] = field(default_factory=lambda: [0.0, 1.0e-4])
    # Linear probe epochs.
    epochs: int = 100
    # k of the k-NN classifier.
    knn_k: int = 20
    # Also report the probe for a randomly initialised backbone and raw pixels.
    baselines: bool = True


@dataclass
class MixConfig:
    # Share of each trainer batch's caption groups that are real images (0 = synthetic only).
    # A real image is a group of one image whose k views are k augmentations (SimCLR positives).
    real_fraction: float = 0.0
    # Real image-caption source: an ImageFolder root (<root>/<class>/<image>, the caption made
    # from the folder name) or a WebDataset shard glob/folder (image + "txt" caption per sample).
    real_path: str = ""
    # Caption of an ImageFolder image: the folder name ("_" read as a space) put in here.
    caption_template: str = "a photo of a {}"
    # Skip (count and log as mix/skipped) real images that do not decode, samples without an
    # image or caption, and the unreadable rest of a corrupt shard, instead of failing.
    skip_bad_samples: bool = False
    # Batches of real images decoded ahead on a background thread, off the trainer's critical
    # path (0: decode on the trainer's thread, as each batch is made).
    prefetch_batches: int = 2


@dataclass
class Config:
    # Where the run writes config, checkpoints, TensorBoard events and results.
    output_dir: str = "runs/default"
    # Continue from the newest complete checkpoint in output_dir.
    resume: bool = False
    # Seed of model init, augmentation and sampling.
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    producer: ProducerConfig = field(default_factory=ProducerConfig)
    procedural: ProceduralConfig = field(default_factory=ProceduralConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    captions: CaptionsConfig = field(default_factory=CaptionsConfig)
    shards: ShardsConfig = field(default_factory=ShardsConfig)
    roles: RolesConfig = field(default_factory=RolesConfig)
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    transport: TransportConfig = field(default_factory=TransportConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    mix: MixConfig = field(default_factory=MixConfig)
