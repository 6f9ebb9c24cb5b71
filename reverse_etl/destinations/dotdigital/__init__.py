"""Dotdigital: contacts through v3 imports, data fields and address books through v2."""
