"""ResNet-50 on ImageNet (ILSVRC 2012) through TFDS; the archives must be in
data.manual_dir (TFDS cannot download them). Accelerator-scale. The loader keeps
images in memory as uint8 at image_size 224 (150 KB each), so training uses a
seeded subset of data.train_examples images (100,000 = 15 GB; raise it where
memory allows) and evaluation a 10,000-image subset of the validation split:
accuracies are those of that recipe, not of the reference ResNet training."""

from experiments import defaults


def get_config():
  config = defaults.base(
      "imagenet2012_resnet50",
      data=dict(name="imagenet2012", image_size=224, train_examples=100000,
                test_examples=10000),
      model=dict(name="resnet50", width=64),
      train=dict(optimizer="sgd", learning_rate=0.1, weight_decay=1e-4, epochs=90,
                 batch_size=256, warmup_steps=5000, flip=True),
  )
  config.eval_batch_size = 250
  # Per-leaf sampling of a 25M-parameter model: drop the O(N)-memory iid sampler
  # and the larger ensembles from the default grid.
  config.sweep.samplers = ["stratified", "systematic"]
  config.sweep.ensembles = [4]
  return config
