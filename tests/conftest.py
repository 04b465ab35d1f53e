import os

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

pytest_plugins = ["tests.chdb_fixture", "tests.gateway_fixture", "tests.board_seed", "tests.browser_fixture"]
