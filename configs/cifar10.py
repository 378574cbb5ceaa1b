r"""CIFAR-10, jointly trained multi-exit ResNets.

Presets (the `:arg` after the file name):

  (none)  ResNet-18, 4 exits (after each stage), 200 epochs: the GPU recipe.
            python -m eejax.main --config configs/cifar10.py --workdir /tmp/r18 \
              --config.data.source=folder:../shared/data/cifar10
          Result on one H100 (README.md, "On a GPU"), with bfloat16, batch 512, learning rate 0.4,
          2 warm-up epochs, label smoothing 0.1 and 120 epochs: 88.75% final-exit test accuracy
          (exits 80.04 / 86.50 / 88.63 / 88.75%), short of the 94.5% such a ResNet-18 should reach;
          launch/gpu_evidence.py ablates the exits' heads, weights and learning rate to find out why.
  cpu     ResNet-8 (16/32/64 channels), 3 exits, 8 epochs: trains on a 2-core CPU.
            python -m eejax.main --config configs/cifar10.py:cpu --workdir /tmp/cpu \
              --config.data.source=folder:../shared/data/cifar10
          Result: 71.69% final-exit test accuracy (exits 53.48 / 66.33 / 71.69%), 10 min 44 s
          wall-clock in all on a 2-core CPU (README.md).
  smoke   A few steps of a tiny ResNet-8 on a few images: seconds, for tests.

ERDE (Guidez et al., arXiv 2510.04856), teacher ResNet-34 -> student ResNet-18,
both with the paper's exit head (BN, ReLU, 2x2 avg-pool, dropout, dense):
  erde_teacher  the teacher, trained jointly.
  erde          the student distilled with ERDE; needs --config.erde.teacher=TEACHER_WORKDIR.
  erde_kd       ablation: KD without the entropy term (KD towards the teacher on every image).
  erde_student  ablation: the student alone, trained jointly.
  bash: python launch/erde.py --scale gpu runs all four and writes one comparison table.
Result: launch/erde.py --scale cpu gives the small-scale table; on one H100 (15 epochs, lr 0.4)
the KD and ERDE students' early exits collapsed in the warm-up (README.md, "On a GPU").

Multi-exit self-distillation, ResNet-18 (4 exits), 200 epochs; `_cpu` variants use the cpu preset:
  mate / mate_cpu    MATE (Sun et al. 2024): learned ensemble teachers, one per exit (config.mate).
  byot / byot_cpu    Be Your Own Teacher: every exit distils from the deepest (config.byot).
  joint_cpu          the joint baseline at the cpu preset's size.
  python launch/self_distillation.py --config configs/cifar10.py --scale cpu|gpu compares all three.
Result on one H100, 15 epochs each: final exit joint 86.29, BYOT 85.16, MATE 87.16% (README.md).
The weights, temperature, sign and form of the entropy term and the exit pairing
are our reading of the paper (its full text is not available): see config.erde.

BTS-EE (Aperstein & Apartsin, arXiv 2509.08318): lightweight 1D-conv branches trained one after
another on a frozen backbone run, each only on the images earlier branches did not take, with
per-class Class Precision Margin thresholds (scheme=boosted, config.bts; eejax/boosted.py):
  bts      branches after blocks 2, 4, 6 of a ResNet-18 trained with this file's default preset.
             python -m eejax.main --config configs/cifar10.py:bts --workdir /tmp/bts \
               --config.bts.backbone=/tmp/r18 --config.data.source=folder:../shared/data/cifar10
  bts_cpu  branches after blocks 1, 2 of the ResNet-8 of the cpu preset (--config.bts.backbone=/tmp/cpu).
  Result (bts_cpu): README.md, "BTS-EE". python launch/bts_grid.py runs the 64-configuration grid.
Our reading of the paper, labelled in config.bts: the branch pools the feature map and runs a 1D
convolution along the channels before a dense layer; targets are the labels (KD from the backbone at
T=4 optional); CPM (`bts.cpm`, eejax/cpm.py) by default follows our reconstruction of the CalexNet
papers' rule (relative margin, a support floor of 30 validation images, the largest prefix of the
confidence-sorted predictions whose precision clears the bar); `bts.cpm=absolute` is eejax's first
reading (the lowest threshold whose precision is at least the backbone's minus the margin). A class with
no valid threshold never exits at that branch.

SDN (Kaya et al. 2019), ResNet-56 with SDN's six internal classifiers (after blocks 4, 8, ..., 24; the `sdn`
head: mixed max and average pooling to about 4x4, one dense layer) and SDN's recipe (100 epochs, SGD, lr 0.1
stepped down 10x at epochs 35, 60, 85, weight decay 1e-4); `_cpu` variants: ResNet-8, exits after blocks 1, 2, 3:
  sdn_cnn / sdn_cnn_cpu      the network alone, one exit (the IC-only runs' backbone).
  ic_only / ic_only_cpu      SDN's IC-only training on it, frozen: --config.ic_only.backbone=CNN_WORKDIR
                             (Adam, lr 1e-3, 25 epochs stepped down at 15; _cpu: 4 epochs).
  sdn / sdn_cpu              SDN training: the classifiers' weights grow each epoch (config.sdn).
  sdn_joint / sdn_joint_cpu  the same network and classifiers trained jointly, every exit weighing 1.
  python launch/sdn.py --scale cpu|gpu runs all four and writes one table. Result (cpu): README.md, "SDN".

Other backbones by name: --config.model.name=resnet20 (or 8/56/110, 34/50), mobilenet (SDN's CIFAR
MobileNet, v1), e.g. with --config.model.width=0.5 at ResNet-8's MACs (README.md, "MobileNet at ResNet-8's cost"),
vgg16 (SDN's CIFAR VGG-16 with BatchNorm; --config.model.exit_after=1,3,5,6,8,9 places SDN's six internal
classifiers; README.md, "VGG-16"), or wrn32_4 (SDN's WideResNet-32-4, pre-activation, dropout 0.3 in each
block; SDN's six: --config.model.exit_after=3,5,7,9,11,13).

Every leaf can be overridden, e.g. `--config.train.epochs=10`.
"""
import ml_collections
from ml_collections import config_dict


ERDE_PRESETS = ("erde_teacher", "erde", "erde_kd", "erde_student")
SELF_DISTILLATION_PRESETS = ("mate", "byot", "mate_cpu", "byot_cpu", "joint_cpu")
BTS_PRESETS = ("bts", "bts_cpu")
SDN_PRESETS = ("sdn_cnn", "sdn", "sdn_joint", "ic_only", "sdn_cnn_cpu", "sdn_cpu", "sdn_joint_cpu", "ic_only_cpu")
PRESETS = ERDE_PRESETS + SELF_DISTILLATION_PRESETS + BTS_PRESETS + SDN_PRESETS
SDN_RESNET56_EXITS = (4, 8, 12, 16, 20, 24, 27)  # SDN's six internal classifiers (15 to 90% of the MACs), the last


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.scheme = "joint"  # joint: weighted sum of per-exit cross-entropies | erde: distillation, see below
  config.init_from = ""  # a workdir whose latest parameters start this run (unless resuming)
  config.distributed = False  # True: join the multi-process job JAX finds in the environment (SLURM, MPI, TPU pods)
  config.compile_cache_dir = "~/.cache/eejax/xla"  # compiled programs kept for later jobs (eejax.xla_cache); '' off
  config.compile_cache_max_gb = 2.0  # each job first trims that folder to this size, oldest-used first; 0: no limit

  config.model = ml_collections.ConfigDict()
  config.model.name = "resnet18"  # resnet8/20/56/110 (thin), resnet18/34/50; SDN's CIFAR mobilenet (v1), vgg16, wrn32_4
  config.model.width = 1.0  # channel multiplier
  config.model.exit_after = config_dict.placeholder(tuple)  # 1-based block numbers; None: after each stage
  config.model.head = "linear"  # linear | pool_conv | erde | mlp | preact | sdn: every exit but the last
  config.model.head_width = 128  # channels of heads with a hidden layer
  config.model.head_dropout = 0.0  # dropout before each head's dense layer
  config.model.exit_grad_scale = 1.0  # share of each early exit's gradient that reaches the backbone; 0: none
  config.model.dtype = "float32"  # compute dtype: float32 | bfloat16 (parameters stay float32)

  config.data = ml_collections.ConfigDict()
  config.data.source = "cifar10"  # built-in (downloaded once) | NAME:PATH (its original file) | folder:PATH | tfds:NAME
  config.data.mirror = ""  # built-in sources: a base URL serving the original file names instead of their homes
  config.data.max_images = 0  # per split, a seeded random subset for quick runs; 0: all
  config.data.test_split = "test"  # folder sources: the folder of the labelled evaluation split
  config.data.val_size = 5000  # images carved from train when the source has no validation split
  config.data.val_seed = 0
  config.data.image_size = config_dict.placeholder(int)  # resize to NxN; None keeps the source's size
  config.data.cache_dir = "~/.cache/eejax"  # decoded uint8 arrays; '' disables the cache
  config.data.tfds_data_dir = config_dict.placeholder(str)  # None: tfds's default (~/tensorflow_datasets)
  config.data.download = False  # tfds only: download and prepare when missing (needs network and TensorFlow)
  config.data.crop_pad = 4  # pixels of zero padding for the random crop; 0 disables the crop
  config.data.flip = True  # random horizontal flip

  config.train = ml_collections.ConfigDict()
  config.train.epochs = 200
  config.train.batch_size = 128  # global, over all devices
  config.train.learning_rate = 0.1  # peak, for this batch size
  config.train.schedule = "cosine"  # cosine (to 0) | step
  config.train.warmup_epochs = 1.0  # linear warm-up from 0
  config.train.step_epochs = (100, 150)  # step schedule: epochs at which lr *= step_factor
  config.train.step_factor = 0.1
  config.train.optimizer = "sgd"  # sgd | adam
  config.train.momentum = 0.9  # sgd
  config.train.nesterov = True
  config.train.weight_decay = 5e-4
  config.train.weight_decay_on = "kernels"  # kernels (conv and dense) | all (BatchNorm and biases too: SDN's code)
  config.train.init = "flax"  # first kernels: flax (lecun-normal, zero biases) | pytorch (PyTorch's default draw)
  config.train.label_smoothing = 0.0
  config.train.grad_clip = 0.0  # > 0: gradients scaled to at most this global norm; 0: off
  config.train.exit_weights = config_dict.placeholder(tuple)  # per-exit loss weights; None: all 1
  config.train.steps_per_call = 50  # training steps per jitted call (lax.scan)
  config.train.transfer_guard = "disallow"  # host-to-device copies in the training loop: disallow | log | allow

  # scheme=erde (Guidez et al. 2025). The paper's full text is not available: these defaults are our reading.
  config.erde = ml_collections.ConfigDict()
  config.erde.teacher = ""  # workdir of a trained early-exit teacher run (frozen, never saved with the student)
  config.erde.temperature = 4.0  # KD temperature t (loss scaled by t^2); our reading
  config.erde.kd_weight = 1.0  # weight of KD next to the cross-entropy; our reading
  config.erde.entropy_weight = 0.1  # weight of the entropy term on teacher errors (maximised); our reading
  config.erde.drop_kd_on_errors = True  # no KD towards a wrong teacher; our reading
  config.erde.reference = "own"  # which teacher exit decides "wrong": own (the paired exit) | final
  config.erde.pairing = config_dict.placeholder(tuple)  # teacher exit (0-based) per student exit; None: by depth

  # scheme=mate (Sun et al. 2024) and its baseline byot. The paper's full text is not available: our reading.
  config.mate = ml_collections.ConfigDict()
  config.mate.temperature = 3.0  # softening of the teachers' outputs and the exits' (KL scaled by t^2)
  config.mate.primary_weight = 0.7  # share of exit i's target from its own teacher i; the rest spread evenly
  config.mate.kd_weight = 1.0  # weight of every exit's KL next to its cross-entropy
  config.byot = ml_collections.ConfigDict()
  config.byot.temperature = 3.0
  config.byot.kd_weight = 1.0

  # scheme=boosted (BTS-EE, Aperstein & Apartsin 2025). Full text not available: defaults are our reading.
  config.bts = ml_collections.ConfigDict()
  config.bts.backbone = ""  # workdir of a finished eejax run: frozen (BN statistics too); its final exit is the reference
  config.bts.positions = (2, 4, 6)  # 1-based blocks after which a branch sits (ResNet-18: ends of stages 1-3)
  config.bts.head_width = 8  # filters of each branch's 1D convolution (kernel 3, stride 2 along the channels)
  config.bts.margins = (0.0, 0.02, 0.05, 0.1)  # CPM margins, as fractions of precision (0.02 = 2 points)
  config.bts.baseline = True  # also train the non-boosted baseline: every branch on every image, same CPM
  config.bts.epochs = 20.0  # per branch, over the training images in play (no augmentation: cached features)
  config.bts.batch_size = 256
  config.bts.learning_rate = 1e-3  # Adam, cosine decay to 0 over each branch's training
  config.bts.weight_decay = 5e-4  # on kernels
  config.bts.distill_weight = 0.0  # our reading's default: labels only; e.g. 0.5 mixes in KD from the backbone
  config.bts.distill_temperature = 4.0
  config.bts.cpm = "paper"  # paper: relative margin, support floor, exact confidences (our reconstruction) | absolute
  config.bts.min_support = 30  # paper CPM: validation images of a predicted class that must pass its threshold
  config.bts.num_thresholds = 101  # absolute CPM's candidate thresholds: linspace(0, 1, n) on the max probability
  config.bts.steps_per_call = 50  # branch training steps per jitted call (lax.scan)

  # scheme=sdn and scheme=ic_only: SDN's two ways of training internal classifiers (Kaya et al. 2019).
  config.sdn = ml_collections.ConfigDict()
  config.sdn.max_weights = config_dict.placeholder(tuple)  # C_i per internal classifier; None: 0.9 i / I
  config.sdn.start_weight = 0.01  # at epoch e of E an internal classifier weighs min(C_i, 0.01 + e C_i / E)
  config.ic_only = ml_collections.ConfigDict()
  config.ic_only.backbone = ""  # workdir of a trained run of the same model: its backbone and final exit, frozen

  config.eval = ml_collections.ConfigDict()
  config.eval.batch_size = 1000
  config.eval.every_epochs = 1.0  # score every exit on the validation split this often during training; 0: never
  config.eval.num_thresholds = 200  # points on the accuracy-against-MACs curve
  config.eval.budgets = (0.25, 0.5, 0.75, 1.0)  # fractions of the full network's MACs
  config.eval.policies = ("max_prob", "entropy", "patience")  # curves on test
  config.eval.fit_policies = ("max_prob", "entropy")  # thresholds fitted on val per budget, reported on test
  config.eval.real_inference = True  # time real batched early exit at the 50% budget's thresholds
  # Thresholds certified by Learn then Test (eejax.risk): risk <= epsilon with probability >= 1 - delta.
  config.eval.risks = ("disagreement", "accuracy_loss")
  config.eval.risk_epsilons = (0.005, 0.01, 0.02, 0.05)
  config.eval.risk_delta = 0.1
  config.eval.risk_family = "global"  # global (one threshold, grid fixed in advance) | per_exit (half of val builds it)

  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.every_steps = 2000
  config.checkpoint.max_to_keep = 2

  config.log = ml_collections.ConfigDict()
  config.log.every_s = 10.0  # progress line interval when not in a terminal
  config.log.tensorboard = True

  if arg == "cpu":
    config.model.name = "resnet8"
    config.train.epochs = 8
    config.train.batch_size = 128
    config.train.learning_rate = 0.2
    config.train.warmup_epochs = 0.5
    config.train.label_smoothing = 0.1
    config.train.steps_per_call = 2  # unrolled on CPU (see eejax.train.make_train_chunk)
    config.checkpoint.every_steps = 500
  elif arg == "smoke":
    config.model.name = "resnet8"
    config.model.width = 0.25
    config.data.max_images = 96
    config.data.val_size = 16
    config.train.epochs = 2
    config.train.batch_size = 16
    config.train.learning_rate = 0.05
    config.train.steps_per_call = 2
    config.eval.batch_size = 32
    config.eval.num_thresholds = 10
    config.checkpoint.every_steps = 4
    config.log.every_s = 0.0
  elif arg in ERDE_PRESETS:
    config.model.name = "resnet34" if arg == "erde_teacher" else "resnet18"
    config.model.head = "erde"
    config.model.head_dropout = 0.2
    if arg in ("erde", "erde_kd"):
      config.scheme = "erde"
    if arg == "erde_kd":
      config.erde.entropy_weight = 0.0
      config.erde.drop_kd_on_errors = False
  elif arg in ("mate", "byot", "mate_cpu", "byot_cpu", "joint_cpu"):
    if arg.endswith("_cpu"):
      config = get_config("cpu")
    config.scheme = arg.split("_")[0]
  elif arg in BTS_PRESETS:
    config.scheme = "boosted"
    if arg == "bts_cpu":
      config.bts.positions = (1, 2)
  elif arg in SDN_PRESETS:
    config = sdn_preset(arg)
  elif arg:
    raise ValueError(f"unknown preset {arg!r} for configs/cifar10.py; valid: cpu, smoke, {', '.join(PRESETS)}")
  return config


def sdn_preset(arg: str) -> ml_collections.ConfigDict:
  """SDN's recipe (its released code): SGD, lr 0.1 stepped down 10x at epochs 35, 60 and 85 of 100, weight
  decay 1e-4 (SDN's for ResNets and MobileNet; 5e-4 for VGG and WRN), no warm-up; IC-only: Adam, lr 1e-3 stepped
  down at epoch 15 of 25. `_cpu`: the cpu preset's ResNet-8 with exits after blocks 1, 2, 3 (the network alone:
  3) and its recipe at SDN's learning rate, 0.1; IC-only 4 epochs of Adam."""
  cpu = arg.endswith("_cpu")
  name = arg.removesuffix("_cpu")
  config = get_config("cpu" if cpu else None)
  if cpu:  # SDN's learning rate: at the cpu preset's 0.2 one joint run of three diverged (NaN at step 210)
    config.model.exit_after = (3,) if name == "sdn_cnn" else (1, 2, 3)
    config.train.learning_rate = 0.1
  else:
    config.model.name = "resnet56"
    config.model.exit_after = SDN_RESNET56_EXITS[-1:] if name == "sdn_cnn" else SDN_RESNET56_EXITS
    config.train.epochs, config.train.schedule, config.train.step_epochs = 100, "step", (35, 60, 85)
    config.train.learning_rate, config.train.weight_decay, config.train.warmup_epochs = 0.1, 1e-4, 0.0
    config.train.nesterov = False
  config.model.head = "sdn"
  config.scheme = {"sdn_cnn": "joint", "sdn_joint": "joint"}.get(name, name)
  if name == "ic_only":
    config.train.optimizer, config.train.learning_rate, config.train.schedule = "adam", 1e-3, "step"
    config.train.epochs, config.train.step_epochs, config.train.warmup_epochs = (4, (3,), 0.0) if cpu else (25, (15,), 0.0)
  return config
