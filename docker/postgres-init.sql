-- Run once by the postgres image on an empty data volume: MLflow's own database (Prefect uses POSTGRES_DB).
CREATE DATABASE mlflow OWNER llm;
