"""Coverage-guided fuzz harnesses (atheris). Scripts, not tests: pytest collects nothing here
(``test_*.py`` only). See the README's "Fuzzing" section."""
