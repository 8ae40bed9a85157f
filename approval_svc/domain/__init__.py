"""The business of the command side in pure Python: accounts, payments, the rules that decide them."""
