"""bloodcell: peripheral blood cell image classification (PBC dataset, 8 classes)."""
__version__ = "0.1.0"

CLASSES = ["basophil", "eosinophil", "erythroblast", "ig", "lymphocyte", "monocyte",
           "neutrophil", "platelet"]


def __getattr__(name):  # lazy: `import bloodcell` stays cheap, torch loads on use
    if name == "Classifier":
        from .predict import Classifier
        return Classifier
    raise AttributeError(name)
