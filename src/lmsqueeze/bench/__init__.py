"""lmsqueeze.bench"""
