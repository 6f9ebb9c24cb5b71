"""The demo's profile mapping, shared by the benchmarks so they measure the same work."""

PROFILE_MAPPING = """    phone_region_column: country
    mapping:
      email: email
      phone: phone_number
      customer_id: external_id
      first_name: first_name
      last_name: last_name
      city: location.city
      country: location.country
      postcode: location.zip
      loyalty_tier: properties.Loyalty_Tier
      loyalty_points: properties.Loyalty_Balance
      lifetime_value: properties.Lifetime_Value
      birthday: properties.Birthday
      is_vip: properties.VIP
    consent:
      email: {column: email_consent, consented_at: consent_updated_at}
      sms: sms_consent
"""
