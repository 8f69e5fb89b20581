#!/bin/sh
# The Python "driver" that spark-submit starts when the job runs on the embedded engine (--engine local)
# or on a Spark Connect server (--engine remote): jobs/airflow/semantic_ids_dag.py sets it as
# PYSPARK_DRIVER_PYTHON for those engines, and CSID_PYTHON to the project environment's python.
#
# spark-submit starts every Python application with MASTER (and the Py4J gateway of its JVM) in the
# environment. Those engines are Spark Connect clients, and pyspark refuses a Connect session while
# MASTER is set ([CANNOT_CONFIGURE_SPARK_CONNECT_MASTER]); the JVM is only the launcher here, so the
# variables are dropped and the job runs unchanged. The exit code is the job's (exec), and spark-submit
# exits with it.
unset MASTER SPARK_REMOTE PYSPARK_GATEWAY_PORT PYSPARK_GATEWAY_SECRET
exec "${CSID_PYTHON:?CSID_PYTHON must name the python of the project environment (the DAG param python)}" "$@"
