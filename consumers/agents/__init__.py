"""The agent roles (planner, retriever, editor, writer, validator, answerer) and their backends."""
