"""Dotdigital: contacts through v3 contact imports (with data fields and address books through
v2), orders and product catalogs as v3 insight data."""
