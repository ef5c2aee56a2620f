"""ResNet-50 on ImageNet through TFDS (manual download; see
``experiments.defaults.imagenet``)."""

from experiments import defaults


def get_config():
  return defaults.imagenet(
    "imagenet2012_resnet50", model=dict(name="resnet50", width=64)
  )
