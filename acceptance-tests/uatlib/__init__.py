"""Helpers shared by bmi-uat.py and the behave steps (no BMI imports: the tests are black-box)."""
