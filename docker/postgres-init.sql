-- Run once, when the postgres service first creates its data volume: the Optuna studies live in
-- their own database beside MLflow's (POSTGRES_DB=mlflow).
CREATE DATABASE optuna;
