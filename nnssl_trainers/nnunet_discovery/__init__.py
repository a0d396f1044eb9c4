"""How ``nnUNetv2_train -tr SwinUNETR_..._Trainer`` finds our trainers without the user typing a path.

nnU-Net 2.8.1 looks for trainer classes in its own package and then in the folders listed in the
``nnUNet_extTrainer`` environment variable. The ``nnssl_trainers.pth`` file that pip installs into
site-packages calls :func:`register` at interpreter start-up, which appends this folder to that
variable (keeping any folders the user listed). nnU-Net then imports ``nnssl_trainer_classes`` from
here, which re-exports the classes of :mod:`nnssl_trainers.swinunetr` and :mod:`nnssl_trainers.baseline`.
"""
import os

FOLDER = os.path.dirname(os.path.abspath(__file__))


def register() -> None:
    current = [p for p in os.environ.get("nnUNet_extTrainer", "").split(os.pathsep) if p]
    if FOLDER not in current:
        os.environ["nnUNet_extTrainer"] = os.pathsep.join(current + [FOLDER])
