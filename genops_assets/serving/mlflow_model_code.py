"""The pyfunc of a registered version, as MLflow's models-from-code file: logging copies this
file into the model and loading runs it, so no pickled Python object is ever stored or loaded
(genops runs with ``MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false``)."""

from mlflow.models import set_model

from genops_assets.serving.mlflow_model import AdapterVersionModel

set_model(AdapterVersionModel())
