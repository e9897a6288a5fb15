"""The CIFAR model zoo of the distillation literature; importing this package registers it."""
from . import mobilenetv2, resnet, resnet_imagenet_style, shufflenetv1, shufflenetv2, vgg, wrn  # noqa: F401
from . import densenet, googlenet  # noqa: F401,E402  (the FFSD paper's DenseNet-40 and GoogLeNet)
