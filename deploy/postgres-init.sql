-- Databases of deploy/docker-compose.yml: the Dagster instance, MLflow's runs and registry, MLflow's users.
CREATE DATABASE dagster;
CREATE DATABASE mlflow;
CREATE DATABASE mlflow_auth;
