-- One database per service: each keeps its own migrations table.

CREATE DATABASE jobs;

CREATE DATABASE scheduler;

CREATE DATABASE metrics;

CREATE DATABASE diagnosis;
