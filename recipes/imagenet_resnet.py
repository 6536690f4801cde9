"""ImageNet ResNet-50 (torchvision) on an ImageFolder tree: ``data.root/train/<class>/*.jpg``, ``data.root/val/...``.

    lowmem-train recipe=imagenet_resnet data.root=/datasets/imagenet
    lowmem-train recipe=imagenet_resnet data=synthetic data.batch_size=256   # random 224x224 images
"""

from __future__ import annotations

import os

import torchvision
from torch import nn
from torchvision import transforms

from lowmem_train.data import make_loader, synthetic_images
from lowmem_train.errors import ConfigError, one_line
from lowmem_train.recipe import ImageClassification

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class ImageNetResNet(ImageClassification):
    name = "imagenet_resnet"
    data_sources = ("imagefolder", "synthetic")

    def build_model(self) -> nn.Module:
        arch = self.model_cfg.get("arch")
        if not (isinstance(arch, str) and arch.startswith(("resnet", "wide_resnet", "resnext"))):
            raise ConfigError(f"model.arch={arch} is not a torchvision ResNet; recipe imagenet_resnet needs model=resnet50")
        weights = self.model_cfg.get("weights")  # e.g. IMAGENET1K_V2 (downloads), or null for random init
        kwargs = {} if weights else {"num_classes": int(self.model_cfg.num_classes)}
        return getattr(torchvision.models, arch)(weights=weights, **kwargs)

    def build_untrained_model(self) -> nn.Module:
        return getattr(torchvision.models, self.model_cfg.arch)(num_classes=1000 if self.model_cfg.get("weights")
                                                                else int(self.model_cfg.num_classes))

    def build_dataloaders(self):
        data = self.data_cfg
        size = int(data.image_size)
        if data.name == "synthetic":
            train = synthetic_images(int(data.num_samples), size, int(self.model_cfg.num_classes), int(data.seed))
            return make_loader(train, data, train=True), None
        root = os.path.expanduser(str(data.root))
        if not os.path.isdir(os.path.join(root, "train")):
            raise ConfigError(f"data.root={root} has no train/ folder; expected an ImageFolder tree root/train/<class>/*")
        normalize = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
        train_tf = transforms.Compose([transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(),
                                       transforms.ToTensor(), normalize])
        val_tf = transforms.Compose([transforms.Resize(int(size * 256 / 224)), transforms.CenterCrop(size),
                                     transforms.ToTensor(), normalize])
        train = image_folder(os.path.join(root, "train"), train_tf)
        if len(train.classes) > int(self.model_cfg.num_classes):
            raise ConfigError(f"data.root={root} has {len(train.classes)} classes but model.num_classes="
                              f"{self.model_cfg.num_classes}; set model.num_classes={len(train.classes)}")
        val_dir = os.path.join(root, "val")
        val = image_folder(val_dir, val_tf) if os.path.isdir(val_dir) else None
        if val is not None and val.classes != train.classes:
            raise ConfigError(class_mismatch(root, train.classes, val.classes))
        return make_loader(train, data, train=True), None if val is None else make_loader(val, data, train=False)


def image_folder(path: str, transform) -> torchvision.datasets.ImageFolder:
    """An ImageFolder tree, or a one-line ConfigError when it has no class folders or no images in them."""
    try:
        return torchvision.datasets.ImageFolder(path, transform=transform)
    except FileNotFoundError as exc:
        raise ConfigError(f"data.root: {path} is not an ImageFolder tree ({one_line(exc)}); expected "
                          f"{path}/<class>/<image>.jpg") from None


def class_mismatch(root: str, train: list[str], val: list[str]) -> str:
    """Why val/ cannot be scored against train/: ImageFolder numbers classes by their sorted folder names, so
    a class only one side has shifts every later label (a val/horse would be scored as the train class with
    its index)."""
    def some(names: list[str]) -> str:
        return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")

    extra, missing = [c for c in val if c not in train], [c for c in train if c not in val]
    differences = ([f"val/ has {some(extra)} (not in train/)"] if extra else []) + \
        ([f"val/ lacks {some(missing)}"] if missing else [])
    return (f"data.root={root}: the validation classes differ from the training classes: {'; '.join(differences)}; "
            "give val/ the same class folders as train/")
