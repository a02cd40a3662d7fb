"""The "model from code" of every registered CAE: MLflow runs this file to build the pyfunc."""

from mlflow.models import set_model

from cae.tracking.pyfunc import CounterfactualModel

set_model(CounterfactualModel())
