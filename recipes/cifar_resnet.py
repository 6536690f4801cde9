"""CIFAR-style ResNet: torchvision's ResNet with a 3x3 stride-1 stem and no max-pool, for 32x32 images.

    lowmem-train                                       # digits (ships with scikit-learn), offline
    lowmem-train data=cifar10 data.root=~/data/cifar10 # CIFAR-10 (downloaded when online)
    lowmem-train data=synthetic data.batch_size=128    # random 32x32 images, for benchmarks
"""

from __future__ import annotations

import os

import torch
import torchvision
from torch import nn
from torchvision import transforms

from lowmem_train.data import make_loader, split, synthetic_images
from lowmem_train.errors import ConfigError
from lowmem_train.recipe import ImageClassification

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
DATASET_CLASSES = {"digits": 10, "cifar10": 10}


class CifarResNet(ImageClassification):
    name = "cifar_resnet"
    data_sources = ("digits", "cifar10", "synthetic")

    def __init__(self, model, data):
        super().__init__(model, data)
        classes, needed = model.get("num_classes"), DATASET_CLASSES.get(data.name, 1)
        if isinstance(classes, bool) or not isinstance(classes, int) or classes < needed:
            raise ConfigError(f"model.num_classes={classes} is fewer than the {needed} classes of data={data.name}; "
                              f"set model.num_classes={needed}")

    def build_model(self) -> nn.Module:
        arch = self.model_cfg.get("arch")
        if arch not in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152"):
            raise ConfigError(f"model.arch={arch} is not a torchvision ResNet; recipe cifar_resnet needs model=resnet18_cifar "
                              "or model.arch=resnet18|resnet34|resnet50|resnet101|resnet152")
        model = getattr(torchvision.models, arch)(num_classes=int(self.model_cfg.num_classes))
        model.conv1 = nn.Conv2d(3, model.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
        return model

    def build_dataloaders(self):
        data = self.data_cfg
        if data.name == "digits":
            train, val = digits_datasets(data)
        elif data.name == "cifar10":
            train, val = cifar10_datasets(data)
        else:
            train = synthetic_images(int(data.num_samples), int(data.image_size), int(self.model_cfg.num_classes),
                                     int(data.seed))
            val = None
        return make_loader(train, data, train=True), None if val is None else make_loader(val, data, train=False)


def digits_datasets(data):
    """scikit-learn's 1,797 handwritten 8x8 digits as normalised 3-channel images of ``data.image_size``, split
    by ``data.val_fraction``."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = nn.functional.interpolate(images, size=int(data.image_size), mode="bilinear", align_corners=False)
    images = ((images - 0.5) / 0.5).expand(-1, 3, -1, -1).contiguous()
    labels = torch.tensor(digits.target, dtype=torch.long)
    return split(torch.utils.data.TensorDataset(images, labels), data)


def cifar10_datasets(data):
    root = os.path.expanduser(str(data.root))
    normalize = transforms.Normalize(CIFAR_MEAN, CIFAR_STD)
    augment = [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()] if data.augment else []
    train_tf = transforms.Compose([*augment, transforms.ToTensor(), normalize])
    val_tf = transforms.Compose([transforms.ToTensor(), normalize])
    if not data.download and not os.path.isdir(os.path.join(root, "cifar-10-batches-py")):
        raise ConfigError(f"data.root={root} has no cifar-10-batches-py/; point data.root at a CIFAR-10 copy "
                          "or set data.download=true")
    try:
        train = torchvision.datasets.CIFAR10(root, train=True, transform=train_tf, download=bool(data.download))
        val = torchvision.datasets.CIFAR10(root, train=False, transform=val_tf, download=bool(data.download))
    except (OSError, RuntimeError) as exc:  # offline download or a corrupt copy
        raise ConfigError(f"data.root={root}: could not load CIFAR-10 ({exc}); point data.root at an existing copy") from None
    return train, val
